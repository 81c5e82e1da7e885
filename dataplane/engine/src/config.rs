//! The operator's configuration model (SPEC §1), its validation and its compilation into a
//! [`crate::RuleSet`]. OWNER: config helper.
