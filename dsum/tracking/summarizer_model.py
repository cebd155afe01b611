"""The file MLflow runs to build a registered dsum model ("models from code", no pickled objects)."""

from mlflow.models import set_model

from dsum.tracking.registry import Summarizer

set_model(Summarizer())
