"""Pipeline parallelism (project 24): the GPT split into stages (``partition``), GPipe and 1F1B as per-rank
action lists (``schedules``), executed on ``torch.distributed`` ranks (``runtime``); CLI: ``python -m
impl.pipeline_parallelism`` under torchrun. See README.md."""
