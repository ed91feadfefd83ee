"""CFLOW-AD: anomaly detection with localization via conditional normalizing flows."""

from .config import CFlowConfig
from .errors import CflowInputError
from .model import CFlowModel
from .source import DataSource

__all__ = ["CFlowConfig", "CFlowModel", "CflowInputError", "DataSource"]
__version__ = "0.1.0"
