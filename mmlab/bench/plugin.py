"""lmms-eval's entry point (group ``lmms_eval.models`` in pyproject): a manifest naming the ``mmlab``
model's class, which lmms-eval's v2 registry imports only when the model is asked for."""


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mmlab", simple_class_path="mmlab.bench.lmms_model.MMLab")
