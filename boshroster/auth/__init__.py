"""Who a client is: SASL (PLAIN, SCRAM via scramp), the account store, throttling, the HTTP password check."""
