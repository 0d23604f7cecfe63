# One image for the API, the Ray head and the GPU workers: advorch installed on a CUDA torch.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first, from PyPI: in the image that is the CUDA build the GPU workers need.
RUN pip install torch==2.13.0
COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN pip install .

EXPOSE 8000
CMD ["advorch", "serve"]
