"""mmtard: multi-teacher adversarial distillation for robust CLIP models.

The library lives here; ``mmtard.cli`` is the only place that parses arguments.
"""

__version__ = "0.1.0"
