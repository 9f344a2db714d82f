"""An HTTP service in front of a detector: `detkit serve` (docs/serving.md).

    from detkit.serve import ServeOptions, create_app
    app = create_app(ServeOptions(weights="output/shapes_r18/model_final.pth"))   # a FastAPI app

detkit.serve.images checks and decodes the uploaded images, detkit.serve.batcher runs the model
on dynamic batches in worker threads, detkit.serve.app is the FastAPI application (API, metrics,
readiness). The server extra (`pip install detkit[serve]`) brings FastAPI, uvicorn,
python-multipart and prometheus_client; only detkit.serve.app and the command need them.
"""

from detkit.serve.options import ServeOptions

__all__ = ["ServeOptions", "create_app"]


def create_app(options: ServeOptions):
    """The FastAPI application of `options` (imports the serve extra's packages)."""
    from detkit.serve.app import create_app as _create_app

    return _create_app(options)
