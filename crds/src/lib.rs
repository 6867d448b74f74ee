//! FineTuneJob API.
