# mmpipe's pinned environment, for Prefect docker and kubernetes work pools.
#
#   docker build -t mmpipe:0.1.0 .
#   mmpipe deploy configs/demo.yaml --cron "0 3 * * *" --pool mmpipe-docker --pool-type docker \
#       --git https://git.example.org/team/mmpipe.git --image mmpipe:0.1.0
#
# The image holds the dependencies (every one pinned in constraints.txt, as `make install` uses)
# and a copy of the code; with --git each run still starts in a fresh clone of the branch (Prefect's
# pull step), so the image is rebuilt only when a dependency changes. torch comes from PyPI: its
# Linux wheel carries CUDA, so the same image trains on the GPUs a kubernetes pool gives it.
FROM python:3.11-slim

# git for the pull step; libgl/libglib are not needed (opencv-python-headless).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_LOGGING_EXTRA_LOGGERS=mmcore,mmpipe

WORKDIR /opt/mmpipe
COPY pyproject.toml constraints.txt README.md ./
COPY mmcore mmcore
COPY mmpipe mmpipe
COPY tasks tasks
COPY flows flows
COPY deployments deployments
COPY configs configs
COPY prefect.yaml ./
RUN pip install -c constraints.txt ".[s3]" \
    && pip install --no-deps open-clip-torch==3.3.0 \
    && python -c "import mmcore, mmpipe, flows.pipeline, tasks.stages"

# A worker in the container would be started as: prefect worker start --pool NAME
CMD ["mmpipe", "--help"]
