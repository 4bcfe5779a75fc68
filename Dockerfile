# dicom-node on CUDA: onnxruntime-gpu uses the GPU when the container gets one
# (docker run --gpus all), and its CPU provider otherwise.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/dicom-node
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY conf ./conf
COPY models_onnx/*.onnx models_onnx/*.yaml ./models_onnx/
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

RUN useradd --system --home /data --shell /usr/sbin/nologin dicom-node \
    && mkdir -p /data && chown dicom-node:dicom-node /data
USER dicom-node
VOLUME ["/data"]
EXPOSE 11112 9109

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD curl -fsS http://127.0.0.1:9109/readyz || exit 1

ENTRYPOINT ["/opt/venv/bin/dicom-node", "-c", "/opt/dicom-node/conf/node.yaml", \
            "--set", "node.data_dir=/data", "--set", "node.host=0.0.0.0", \
            "--set", "inference.models_dir=/opt/dicom-node/models_onnx"]
CMD ["serve", "--json-logs"]
