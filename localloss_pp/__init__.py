"""localloss-pp: networks trained with local error signals (Nøkland & Eidnes 2019), pipelined
across processes and GPUs.

From Python (docs/python.md):

    import localloss_pp as lp
    result = lp.train(dataset="folder:data/pets", model="vgg8b", epochs=10, stages=2)
    model = lp.load(result.run_dir)            # an ordinary nn.Module, eval mode
    print(lp.evaluate(model).error)

`train`, `load`, `evaluate`, `RunResult`, `TrainedModel`, `Evaluation`, `Config`,
`register_dataset`, `DatasetInfo`, `register_model` and `register_objective` are the public
names; they are imported on first use, so `import localloss_pp` stays light.
"""
__version__ = "0.4.0"

_PUBLIC = {
    "train": "localloss_pp.api", "load": "localloss_pp.api", "evaluate": "localloss_pp.api",
    "TrainedModel": "localloss_pp.api", "Evaluation": "localloss_pp.api",
    "RunResult": "localloss_pp.result", "Config": "localloss_pp.config",
    "register_dataset": "localloss_pp.data.registry", "DatasetInfo": "localloss_pp.data.registry",
    "register_model": "localloss_pp.models", "register_objective": "localloss_pp.models",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'localloss_pp' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
