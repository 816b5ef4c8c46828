"""cluster/ configures, wires and operates the platform: typed config from YAML, the `recsys` command line, the
end-to-end demo, Ray start-up and job-submission entry points."""
