"""The console commands (``transfer-train`` ... ``transfer-serve``), their optional extras, and the
sweep callback that keeps a multirun's best trial."""
