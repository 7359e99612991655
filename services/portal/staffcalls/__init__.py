"""The staff console's calls to the services: one module per area, each building its
requests, calling through Backend.call with the staff member's own token and converting
the answers to plain records (services.portal.staff_records). The stated purposes are
those of config/purposes.yaml that each area's work is."""
