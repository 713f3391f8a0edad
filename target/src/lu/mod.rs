pub mod pr;
