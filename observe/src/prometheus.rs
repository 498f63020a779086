//! PromQL source: placeholder filled below.
