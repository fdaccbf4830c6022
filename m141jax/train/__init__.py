"""Training: flow matching (`flow`), DMD2 step distillation (`dmd`), grain input (`data`), Orbax run
checkpoints (`checkpointing`), the shared run loop (`loop`) and the `train` / `distill` commands (`cli`)."""
