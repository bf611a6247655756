"""lmms-eval integration: run any prunebench pruner inside lmms-eval's standard tasks.

    make setup                   # lmms-eval comes with the locked environment (the `lmms` extra)
    python -m benchmarks.lmms --model prunebench_llava \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=64,layer=2 \
        --tasks gqa,pope,textvqa --batch_size 8
    python -m benchmarks.lmms --model prunebench_qwen2_5_vl \
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=fastv,budget=64 --tasks pope --batch_size 8

Models (lmms-eval's own class with a pruner attached; extra model arguments are the method's parameters):
``prunebench_llava`` (``llava_hf``, ``model.py``), ``prunebench_qwen2_5_vl`` (``qwen2_5_vl``) and
``prunebench_qwen2_vl`` (``qwen2_vl``, both ``qwen.py``); what they share is in ``common.py``.
``python -m benchmarks.lmms`` is lmms-eval's command line with an honest exit code (``__main__.py``).
The models are registered with lmms-eval through the ``lmms_eval.models`` entry point (pyproject.toml),
whose payload lists them all (``manifest.py``). ``python -m benchmarks.lmms.export_shapes DIR`` writes
prunebench's own shapes task as an offline lmms-eval task (use it with ``--include_path DIR``).
"""
