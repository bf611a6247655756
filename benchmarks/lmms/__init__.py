"""lmms-eval integration: run any prunebench pruner inside lmms-eval's standard tasks.

    pip install -e '.[lmms]'     # lmms-eval (+ antlr4 4.9.3 re-pinned for Hydra; `make setup` does both)
    python -m lmms_eval --model prunebench_llava \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=64,layer=2 \
        --tasks gqa,pope,textvqa --batch_size 1

The model is registered with lmms-eval through the ``lmms_eval.models`` entry point (see
pyproject.toml). ``python -m benchmarks.lmms.export_shapes DIR`` writes prunebench's own shapes task
as an offline lmms-eval task (use it with ``--include_path DIR``).
"""
