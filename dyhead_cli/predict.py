"""Old import path of ``dyhead predict``'s engine (kept for scripts that used it, such as the
whole-detector parity checker): the code lives in ``engine/inference.py`` and ``engine/predict.py``."""

from dyhead_cli.engine.inference import LoadedDetector, choose_device, load_detector, run_model
from dyhead_cli.engine.predict import PredictSummary, predict

__all__ = ["LoadedDetector", "PredictSummary", "choose_device", "load_detector", "predict", "run_model"]
