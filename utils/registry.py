"""Name-based discovery of models and datasets, so adding one is adding a file."""
import importlib
import pkgutil
from functools import cache


@cache
def discover(package_name: str, base: type) -> dict[str, type]:
    """Map NAME -> class for every subclass of `base` defined in a module of the package.

    A module (or subpackage) whose name starts with an underscore is skipped; a class counts
    when it has a truthy NAME and was defined inside that module or subpackage.
    """
    package = importlib.import_module(package_name)
    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module_name = f"{package_name}.{info.name}"
        module = importlib.import_module(module_name)
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, base) and getattr(obj, "NAME", None)
                    and obj.__module__.startswith(module_name)):
                found[obj.NAME] = obj
    return dict(sorted(found.items()))
