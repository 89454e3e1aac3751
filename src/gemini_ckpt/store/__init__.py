"""Where checkpoint bytes live: shared-memory slots owned by the machine agent."""
