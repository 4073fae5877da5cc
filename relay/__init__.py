"""SMTP in, durable spool, delivery out. Knows SMTP; knows nothing about prices."""
