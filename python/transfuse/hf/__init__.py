"""transformers integration: which HF module classes transfuse replaces, and with what.

norm.py holds the per-family norm rules (a table keyed by class name); transfuse.patch applies them.
lora.py (peft LoRA over int8 layers) needs peft and is imported on first use: `transfuse.hf.lora`
after `import transfuse`, or `from transfuse.hf.lora import lora_config`.
"""


def __getattr__(name):
    if name == "lora":
        import importlib
        return importlib.import_module(f"{__name__}.lora")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
