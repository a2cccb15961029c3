"""Shared by the stub packages: any attribute is a class that refuses to be used."""


def make_getattr(module: str):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        class Placeholder:
            def __init__(self, *a, **k):
                raise RuntimeError(f"{module}.{name} is a stub in the SAEBench peer venv")

        Placeholder.__name__ = name
        return Placeholder

    return __getattr__
