"""Redis Streams job queue shared by the gateway and the workers."""
