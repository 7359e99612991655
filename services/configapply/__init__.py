"""The config-apply command: makes the rule set and policy the deployment's configuration
names the active ones, through the services' own RPCs (docs/deploy.md, "Configuration
changes on upgrade")."""
