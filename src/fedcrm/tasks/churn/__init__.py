"""The churn task: a tabular MLP over each branch's CRM export (Telco, MLC)."""
