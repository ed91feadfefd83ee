"""CFLOW-AD: anomaly detection with localization via conditional normalizing flows.

The names below are loaded on first use, so that the scoring runtime (an exported .onnx model in
onnxruntime: `runtime`, `inference`, `serve`) can be imported where PyTorch is not installed.
"""

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["CFlowConfig", "CFlowModel", "CflowInputError", "DataSource"]
_HOMES = {"CFlowConfig": "config", "CFlowModel": "model", "CflowInputError": "errors", "DataSource": "source"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'cflow_ad' has no attribute '{name}'")
