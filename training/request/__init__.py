"""What runs per request, shared by serving (`deployments/`) and offline evaluation so both run the same code: the
typed contracts between the stages, request encoding, the retrieval and ranking cores, multi-interest queries and
the quota merge, the policy rules and their config. No Ray here: the Serve deployments are thin shells around it.

May import: `training.data`, `training.models`, `training.metrics`."""
