"""The text side: frozen text encoders, embedding reports, the demo's small MLM, report files and sections."""
