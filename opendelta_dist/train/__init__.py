"""The distributed training framework: a recipe (the loop) over engines (DDP, FSDP2, DeepSpeed, BMTrain).

Nothing here is imported by ``import opendelta_dist``: the delta library stays light.
"""
