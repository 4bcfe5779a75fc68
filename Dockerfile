# dicom-node on CUDA: onnxruntime-gpu uses the GPU when the container gets one
# (docker run --gpus all, host driver 580 or newer), and its CPU provider
# otherwise, saying why in the log (and /readyz with inference.require_gpu).
#
# The CUDA libraries come from the base image, whose CUDA and cuDNN majors
# must be those the pinned onnxruntime-gpu was built for (pyproject.toml:
# CUDA 13, cuDNN 9; tests/test_gpu_providers.py checks the two agree).  The
# image rather than onnxruntime-gpu's [cuda,cudnn] wheel extras with
# preload_dlls(): the extras' ranges (~=13.0) float to the newest 13.x wheels
# at each build, while a tagged image is one fixed set of cudart, cuBLAS,
# cuFFT, cuRAND and cuDNN that the ordinary dynamic linker finds, with no
# preload step in the node.  TensorRT (libnvinfer) is not in it, so the image
# offers the CUDA provider only.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# Not version-pinned: the base image's Ubuntu release pins them (see .hadolint.yaml).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/dicom-node
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY conf ./conf
COPY models_onnx/*.onnx models_onnx/*.yaml ./models_onnx/
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

# A numeric user, so the host and Kubernetes' runAsNonRoot can resolve it.
RUN useradd --system --uid 10001 --user-group --home /data --shell /usr/sbin/nologin dicom-node \
    && mkdir -p /data && chown 10001:10001 /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 11112 9109

# Ready = store writable, models verified, disk free, DICOM port listening,
# workers alive (and with inference.require_gpu, no model on the CPU); urlopen raises (exit 1) on the 503 that names what failed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9109/readyz', timeout=4)"]

# HTTP on all interfaces so Prometheus can scrape from another container; do
# not publish port 9109 beyond the monitoring network.
ENTRYPOINT ["/opt/venv/bin/dicom-node", "-c", "/opt/dicom-node/conf/node.yaml", \
            "--set", "node.data_dir=/data", "--set", "node.host=0.0.0.0", \
            "--set", "node.http.host=0.0.0.0", \
            "--set", "inference.models_dir=/opt/dicom-node/models_onnx"]
CMD ["serve", "--json-logs"]
