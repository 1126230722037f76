"""A/B experiments judged by outcomes: replaying held-out data as live traffic, and the report
that joins logged exposures with the events that followed them."""
