# The tracking server of docker-compose.yml: the official MLflow image plus the PostgreSQL and S3
# drivers it needs, pinned, so a restart never installs anything.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.10 boto3==1.35.99
