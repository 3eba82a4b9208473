"""faster-vla: FASTER-style value-guided noise selection for openpi's π0.5.

Subpackages: `faster_vla.policies` (the π0.5 actor and its openpi I/O), `faster_vla.critics`
(noise and action-chunk critics), `faster_vla.launch` (command-line entry points).
"""

__version__ = "0.1.0"
