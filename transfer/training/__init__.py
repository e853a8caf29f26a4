"""Training: a run is planned (`planner` -> `plan.RunPlan`), then fitted one stage at a time (`fit`);
budget, LR finder, feature cache, callbacks, resume, cross-validation."""
