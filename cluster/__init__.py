"""cluster/ configures, wires and operates the platform: typed config from YAML, the `recsys` command line, the
end-to-end demo, Ray start-up and job-submission entry points."""
import os

# Ray's repeated internal lines stay in the session's log files instead of the terminal: Ray Train V2's
# PlacementGroupCleaner polling the State API, the raylet's worker-count warning on a 2-core node, and Serve's
# queue-length probes that miss their deadline under load. Set before Ray is imported; a user's own value wins.
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX",
                      r"Failed to query Ray Train Controller actor state|Failed to get queue length"
                      r"|Failed to fetch queue length|worker processes have been started on node"
                      r"|Reporting training result|Checkpoint successfully created")
