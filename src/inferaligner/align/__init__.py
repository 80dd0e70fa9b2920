"""`inferaligner align`: one command from a target model, a teacher and the deployment's prompts to an aligned folder
(`recipe`), resumable step by step (`steps`), ending with a short evaluation (`evaluation`), a model card (`card`) and
a self-contained HTML report (`report`)."""

from inferaligner.align.recipe import STEP_NAMES, AlignOptions, align

__all__ = ["STEP_NAMES", "AlignOptions", "align"]
