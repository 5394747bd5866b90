# TensorRT, fp32.  Needs an NVIDIA GPU with TensorRT and mmdeploy's TensorRT
# ops for the TensorRT version installed; not run by this project's CI.
backend_config = dict(type='tensorrt', common_config=dict(fp16_mode=False, max_workspace_size=1 << 30))
