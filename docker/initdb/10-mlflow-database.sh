#!/bin/sh
# Run by the postgres image once, when it initialises an empty data volume (/docker-entrypoint-initdb.d): a
# database of MLflow's own beside orch's, since MLflow's tables (runs, experiments, alembic_version) would clash
# with orch's and Optuna's in one database. An existing volume is never re-initialised: there, create it by hand
#   docker compose ... exec postgres createdb -U "$POSTGRES_USER" mlflow
set -eu
# psql's :"db" quotes the name as an identifier; psql expands variables only in what it reads, hence stdin.
psql -v ON_ERROR_STOP=1 -v db="$MLFLOW_DB" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE DATABASE :"db";
SQL
