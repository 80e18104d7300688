"""``python -m fabric_quant.litgpt <litgpt command> [args]``: litgpt's own CLI with every bitsandbytes mode, on CPU
and CUDA (:func:`fabric_quant.integrations.litgpt.enable` applied first), e.g.

    python -m fabric_quant.litgpt finetune_lora checkpoints/tiny --quantize bnb.nf4-dq --precision bf16-true
"""

from __future__ import annotations


def main() -> None:
    from fabric_quant.integrations.litgpt import enable

    enable()
    from litgpt.__main__ import main as litgpt_main

    litgpt_main()


if __name__ == "__main__":
    main()
