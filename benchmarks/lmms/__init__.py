"""lmms-eval integration: run any prunebench pruner inside lmms-eval's standard tasks.

    make setup                   # lmms-eval comes with the locked environment (the `lmms` extra)
    python -m benchmarks.lmms --model prunebench_llava \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=64,layer=2 \
        --tasks gqa,pope,textvqa --batch_size 8

``python -m benchmarks.lmms`` is lmms-eval's command line with an honest exit code (``__main__.py``).
The model is registered with lmms-eval through the ``lmms_eval.models`` entry point (see
pyproject.toml). ``python -m benchmarks.lmms.export_shapes DIR`` writes prunebench's own shapes task
as an offline lmms-eval task (use it with ``--include_path DIR``).
"""
