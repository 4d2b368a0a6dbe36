"""Ground floor: settings, domain types, errors, bundle format, metrics and device choice; no transport, no service."""
