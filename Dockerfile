# One image for the worker, Flower, the mock DSP and the command line.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cgrid ./cgrid
COPY producer ./producer
COPY delivery ./delivery
COPY worker ./worker
COPY archive ./archive
COPY ops ./ops
COPY examples ./examples
RUN pip install --no-cache-dir . && useradd --create-home cgrid
# The archiver's directory (a volume in docker-compose.yml), writable by the user it runs as.
RUN mkdir /archive && chown cgrid /archive
USER cgrid
CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO"]
