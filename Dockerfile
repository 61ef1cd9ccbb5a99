# GPU image: `docker build -t lora-webui .` then
# `docker run --gpus all -p 7860:7860 -v $PWD/models:/app/models -v $PWD/loras:/app/loras lora-webui`
FROM nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    GRADIO_ANALYTICS_ENABLED=False

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

# torch==2.13.0 from PyPI is the CUDA build on Linux x86-64.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .

VOLUME ["/app/models", "/app/loras", "/app/outputs"]
EXPOSE 7860
CMD ["python", "app.py", "--listen", "--port", "7860"]
