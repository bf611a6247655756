"""`fastervlm` (FasterVLM, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning",
Theia-4869/FasterVLM): the patches the [CLS] token attends to most at the feature layer, top-k.

A declared configuration of `vtc_cls` (data, not a copied class): the authors' `encode_images`
(llava/model/llava_arch.py) takes the CLS row of the attention of the vision tower's ``select_layer``
(-2, the layer LLaVA feeds the LLM; `clip_encoder.py` ``feature_select``), averages it over heads,
keeps the top ``visual_token_num`` patches and passes them to the LLM in raster order (an index mask
over the patch features). That is `vtc_cls` with ``start_layer=-2`` (the feature layer alone;
ensemble ``sum`` of one layer = the row itself). Needs a [CLS] token.
"""

from __future__ import annotations

from pruners.vtc_cls import VTCCLS

FasterVLM = VTCCLS.configuration(
    "fastervlm",
    {"start_layer": -2, "ensemble": "sum"},
    "FasterVLM: top-budget patches by head-mean [CLS] attention at the feature layer (vtc_cls, start_layer=-2).",
)
