"""CIGN model (paper Sec. 3): encoders, class tokens, modality transformers and grouping blocks."""
from cign_train.model.cign import CIGN, CIGNOutput, Prediction, predict
from cign_train.model.encoders import LoadReport, load_encoder_weights

__all__ = ["CIGN", "CIGNOutput", "LoadReport", "Prediction", "load_encoder_weights", "predict"]
