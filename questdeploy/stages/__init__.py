"""The stage graph: calibrate -> finetune -> export -> verify -> build-engine, plus eval."""

STAGE_ORDER = ("calibrate", "finetune", "export", "verify", "build-engine", "eval")
