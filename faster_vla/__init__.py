"""faster-vla: FASTER-style value-guided noise selection for openpi's π0.5.

Subpackages: `faster_vla.policies` (the π0.5 actor and its openpi I/O), `faster_vla.critics`
(noise and action-chunk critics), `faster_vla.launch` (command-line entry points).

`faster_vla.load_policy(path)` loads an exported bundle or an openpi checkpoint as a policy with openpi's
`infer(obs) -> {"actions": ...}` (see `faster_vla.serving.bundle`).
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `import faster_vla` stays light and the package's submodules can import it freely.
    if name == "load_policy":
        from faster_vla.serving.bundle import load_policy

        return load_policy
    raise AttributeError(f"module 'faster_vla' has no attribute {name!r}")
